"""LLM kernels: Triton implementations (one module each) and their plain-PyTorch references (reference.py); dispatch.py picks one."""
