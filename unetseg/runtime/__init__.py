"""Where a run stands on this machine: precision per device, logging."""
