"""Integrations of dwdp_comm with model libraries (each imports its library only when imported itself).

* :mod:`dwdp_comm.integrations.transformers`: Hugging Face transformers MoE models (extra ``[hf]``).
"""
