"""Command-line tools (`python -m trb_jax.tools.<name>`)."""
