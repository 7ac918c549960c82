# Hydra configs of fvis, installed as the package `fvis.conf` (see pyproject.toml).
