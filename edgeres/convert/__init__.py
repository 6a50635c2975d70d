"""The conversion: its config, the bundle builder, the accuracy budget driver above it, and the run."""
