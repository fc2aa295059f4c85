"""Embedded assets (the tiny default Mixtral model) shipped with lorax_server."""
