"""imgbatch: stream huge image folders through hashing and AI analysis, as JSON Lines.

The public API is imported lazily: `import imgbatch` stays cheap, and the Gemini SDK
(0.6 s, 50 MB) is only imported by the provider that needs it.
"""

__version__ = "0.1.0"
