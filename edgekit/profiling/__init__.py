"""Profiling: latency measured on this machine (one interleaved loop), on a device over SSH (the runner
copied there, standard library only), the cost model where nothing can be measured, and the device list.
Named `profiling` so that `edgekit.profile` stays the API verb."""
