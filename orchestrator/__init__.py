"""The Ray-based brain: diagnosis, policies, the worker group, the control loop, the store and the CLI."""
