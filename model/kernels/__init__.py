"""Block-sparse attention kernels for the draft's training form (see model.attention)."""
