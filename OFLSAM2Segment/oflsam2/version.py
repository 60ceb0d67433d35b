"""The engine's version: a leaf, so that modules deep in the package (adapter files record it)
import it without importing the package's public API."""

__version__ = "0.1.0"
