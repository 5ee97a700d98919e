# Sourced by the prepared device commands (gpu_check.sh, paper_cells.sh) on the device machine:
# installs the wheels its image lacks (staged in .carry/ by gpu_prepare.sh) and this project, and
# points the runs at the carried data. Needs $PY and a log() function; pip's own output goes to
# /tmp/idm_install.log so that the command's output tail keeps the measurements.
device_setup() {
  local install_log=/tmp/idm_install.log c100
  if ls .carry/whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl \
      >>"$install_log" 2>&1 || log "installing .carry/whl failed: $(grep -v "^[[:space:]]*$" "$install_log" | tail -1)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$install_log" 2>&1; then
    log "editable install failed ($(grep -v "^[[:space:]]*$" "$install_log" | tail -1)); running from the tree"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  export IDM_CIFAR10=${IDM_CIFAR10:-$PWD/.carry/cifar10-jpeg.tar.gz}
  c100=$(ls .carry/cifar100*.tar.gz 2>/dev/null | head -1)
  [ -n "$c100" ] && export IDM_CIFAR100=${IDM_CIFAR100:-$PWD/$c100}
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
}
