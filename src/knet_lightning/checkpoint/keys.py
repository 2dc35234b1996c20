"""The entries knet-lightning adds to a Lightning checkpoint, beside ``state_dict`` and
``hyper_parameters``: plain values only (dicts, lists, strings, numbers), so that a checkpoint
loads with ``torch.load(weights_only=True)`` and names no class of this package.

``KNetModule.on_save_checkpoint`` writes the model, inference and data entries into every
training checkpoint and ``mode=convert`` the model, inference and conversion entries;
``mode=eval``, ``mode=predict``, ``mode=export`` and :class:`~knet_lightning.Segmenter` read them.
"""

# the model config the network was built from (model.*, with its _target_s): what eval, predict,
# export and the Segmenter rebuild the network from (knet_lightning.checkpoint.model)
MODEL_CONFIG_KEY = "knet_model_config"
# what inference needs besides the network (knet_lightning.inference.segmenter): the test-time
# resize, the normalisation, the padding divisor and the data set's class ids
INFERENCE_KEY = "knet_inference"
# where a checkpoint that mode=convert wrote records its published source
# (knet_lightning.checkpoint.convert)
CONVERSION_KEY = "knet_conversion"
# the resolved data config the network was trained on (its reader, layout, classes and pipeline):
# mode=eval of the checkpoint reads the same data set with nothing but data.root typed
DATA_CONFIG_KEY = "knet_data_config"
