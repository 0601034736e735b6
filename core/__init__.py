"""The ground layer: config, storage, paths, process and Ray set-up, and the data contract. It imports no
other package of the project."""
