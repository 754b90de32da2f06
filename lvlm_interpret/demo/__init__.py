"""The embedded demo model: synthetic scenes with ground-truth masks, and the code that trains and evaluates a
small LLaVA-architecture model on them (see assets/demo-model/README.md)."""
