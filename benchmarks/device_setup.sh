# Sourced by the GPU jobs (gpu_table1.sh, gpu_check.sh) on a GPU machine without a network: installs
# the wheels its image lacks (staged in $STAGE, default .gpu_stage/, by gpu_prepare.sh) and this
# project, and points the runs at the staged data. Needs $PY and a log() function; pip's own output
# goes to /tmp/idm_install.log so that the job's output keeps the measurements.
device_setup() {
  local install_log=/tmp/idm_install.log c100 stage=${STAGE:-.gpu_stage}
  if ls "$stage"/whl/*.whl >/dev/null 2>&1; then  # packages the machine's image lacks
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$stage"/whl/*.whl \
      >>"$install_log" 2>&1 || log "installing $stage/whl failed: $(grep -v "^[[:space:]]*$" "$install_log" | tail -1)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$install_log" 2>&1; then
    log "editable install failed ($(grep -v "^[[:space:]]*$" "$install_log" | tail -1)); running from the tree"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  export IDM_CIFAR10=${IDM_CIFAR10:-$PWD/$stage/cifar10-jpeg.tar.gz}
  c100=$(ls "$stage"/cifar100*.tar.gz 2>/dev/null | head -1)
  [ -n "$c100" ] && export IDM_CIFAR100=${IDM_CIFAR100:-$PWD/$c100}
  # main.py's default (idm_jax/compile_cache.py), for the scripts that are not main.py too
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${IDM_CACHE_DIR:-$HOME/.cache/idm_jax}/jax_compilation}
  return 0
}
