"""An out-of-tree plait model package (see README.md)."""
