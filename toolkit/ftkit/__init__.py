"""ftkit: fine-tune LLMs on one or a few GPUs reproducibly, and get the result served.

Importing this package must stay cheap: the CLI imports it on every start, so nothing
here (or in the modules the CLI imports eagerly) may import torch or transformers.
"""

__version__ = "0.1.0"
