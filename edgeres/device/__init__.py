"""The machine a model runs on: what it has (doctor) and the device profiles that suit it."""
