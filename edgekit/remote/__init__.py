"""Measuring on a device over SSH: `runner.py` is copied to the device (standard library + the device's
runtime, Python 3.6 syntax); `profile.py` drives it and records the measurements."""
