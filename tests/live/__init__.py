"""
Live tests: the official SDKs against the real provider APIs, through a real
C{twistd -n llmproxy} process serving the built-in defaults (the providers'
public base URLs).  Each provider's tests skip, with a message naming the
variable, unless its key is set (C{OPENAI_API_KEY}, C{ANTHROPIC_API_KEY},
C{GEMINI_API_KEY}); keys are never printed.  C{make test-all} runs them all,
C{make env-check} says which keys are set.
"""
