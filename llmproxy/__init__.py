"""
llmproxy: a reverse proxy for LLM provider APIs, built on Twisted.
"""

__version__ = "0.1.0"
