"""
The proxy under attack and under load: each suite reproduces, against a
real daemon on loopback, one way to make a proxy hold too much, wait too
long, count wrong or say too much, at a small scale set by small configured
limits (see docs/operations.md, "Limits that protect the proxy").
"""
