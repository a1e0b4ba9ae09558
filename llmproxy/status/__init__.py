"""
The live status page: its aggregates (L{board}, over the fixed-size
structures of L{series} and L{tables}), who may see it (L{access}) and the
page and its JSON (L{page}).
"""

from llmproxy.status.board import StatusBoard

__all__ = ["StatusBoard"]
