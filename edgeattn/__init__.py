"""edgeattn: long-context Gemma-class LLMs on edge devices with DHSA."""

__version__ = "0.1.0"
