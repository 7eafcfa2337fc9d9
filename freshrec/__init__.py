"""freshrec: the command-line interface and the wiring of processes (`freshrec up`)."""
