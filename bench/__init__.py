"""
The benchmark suite behind C{make bench}: direct versus proxied, in one run.

See C{bench/README.md}.  Entry point: C{python -m bench.run}.
"""
