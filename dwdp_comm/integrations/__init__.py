"""Integrations of dwdp_comm with model libraries (each imports its library only when imported itself).

* :mod:`dwdp_comm.integrations.transformers`: Hugging Face transformers MoE models on DWDP (extra ``[hf]``).
* :mod:`dwdp_comm.integrations.hf_loading`: build one from a local safetensors checkpoint, each rank reading only
  its own experts (block-FP8 and MXFP4 checkpoints included).
* :mod:`dwdp_comm.integrations.hf_quant`: which quantized formats run, how their tensors are named.
* :mod:`dwdp_comm.integrations.hf_quant_checkpoint`: small checkpoints in those formats (tests, examples).
* :mod:`dwdp_comm.integrations.hf_configs`: tiny random configs of the HF MoE families (tests, examples).
"""
