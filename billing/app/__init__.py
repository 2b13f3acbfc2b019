"""What billing staff do, one function each; usage is read through ``ports``, never written."""
