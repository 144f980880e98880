"""Graph passes, one a file: ``renorm_pass`` (training), ``fold_pass`` (inference)."""
