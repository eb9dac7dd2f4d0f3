"""tether: governs what LLM agents do with their tools."""

__version__ = "0.1.0"  # pyproject.toml's; `tether --version` prefers the installed metadata
