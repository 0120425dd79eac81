"""Profiling: latency measured, never only estimated where a measurement is possible. timing.py is the one
interleaved loop; measurer.py the protocol (LocalMeasurer: this host; DeviceMeasurer: a device over SSH,
through device.py and runner.py, the runner copied there, standard library only); side_by_side.py times
two packages for compare/check; costmodel.py (with calibration.py, what it is fitted to) estimates where
nothing can measure; store.py is the profiles/ store; devices.py the device list and the ssh/scp calls.
Named `profiling` so that `edgekit.profile` stays the API verb."""
