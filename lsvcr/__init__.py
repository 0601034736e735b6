"""LSVCR-stream's top layer: the command line and the flows (pipeline, demo, continuous job, model suite,
Ray Jobs). Importing it has no side effects; entry points call core.runtime.setup_process()."""
