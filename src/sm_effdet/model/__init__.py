"""The model: building EfficientDet (efficientdet.py), its one preprocessing, model.json (the
model card), the model folder's files, ONNX export and the standalone inference script.

May import: the package's root modules only (errors, backbones, stops). preprocessing.py,
model_card.py and inference.py are copied into every model folder and import nothing of the
package.
"""
