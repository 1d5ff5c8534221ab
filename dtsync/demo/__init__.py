"""`dtsync demo`: the whole workflow on one machine — a broker, the testbed as a real network and two twins,
the real daemon, and a live view of what it decides."""
