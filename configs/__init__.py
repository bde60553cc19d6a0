"""Run configs (`get_config(arg) -> ConfigDict`); installed as the package `trb_jax.configs`."""
