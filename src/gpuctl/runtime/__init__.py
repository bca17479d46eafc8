"""The daemon's runtime: clock, config, controller, scheduling loop, composition root."""
