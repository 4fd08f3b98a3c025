"""Integrations of dwdp_comm with model libraries (each imports its library only when imported itself).

* :mod:`dwdp_comm.integrations.transformers`: Hugging Face transformers MoE models on DWDP (extra ``[hf]``).
* :mod:`dwdp_comm.integrations.hf_loading`: build one from a local safetensors checkpoint, each rank reading only
  its own experts.
* :mod:`dwdp_comm.integrations.hf_configs`: tiny random configs of the HF MoE families (tests, examples).
"""
