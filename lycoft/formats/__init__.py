"""Adapter file layouts as pure tensors <-> module specs: LyCORIS (native, kohya legacy, LyCORIS 2.0
``oft_diag``) and PEFT. No model objects here: attaching a file to a model is `lycoft.network`'s job."""
