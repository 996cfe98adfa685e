"""The teacher dump: sources, writer thread, multi-host dump, the run itself."""
