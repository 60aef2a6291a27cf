"""Planning a training run from the data and this machine: the survey of a folder, timing, the plan."""
