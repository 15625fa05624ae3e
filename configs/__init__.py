"""The shipped Hydra configs (``stableseg_pp.configs`` once installed: setup.py maps this top-level folder into the
package, so that wheels carry it); Hydra reads the folder itself (``stableseg_pp.config.CONFIG_DIR``)."""
