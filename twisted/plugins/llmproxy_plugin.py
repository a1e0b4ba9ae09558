"""
The C{twistd llmproxy} plugin: only a pointer to L{llmproxy.tap}, so that
listing plugins stays cheap.
"""

from twisted.application.service import ServiceMaker

llmproxy = ServiceMaker(
    "llmproxy",
    "llmproxy.tap",
    "Reverse proxy for LLM provider APIs (OpenAI, Anthropic, Gemini).",
    "llmproxy",
)
