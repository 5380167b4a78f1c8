"""Backbones (ViT, residual CNNs), the DINO head, and the name registry that builds them."""
from kldino.models.registry import (BACKBONES, DINOModel, build_backbone, build_model,
                                    register_backbone, validate_model_config)
from kldino.models.head import DINOHead, HEAD_NORMS, MaskedBatchNorm, PROTOTYPE_MODES
# Imported for their @register_backbone side effect: they fill BACKBONES.
from kldino.models.vit import ViT
from kldino.models.convnet import ResNet

__all__ = [
    'BACKBONES',
    'DINOHead',
    'DINOModel',
    'HEAD_NORMS',
    'MaskedBatchNorm',
    'PROTOTYPE_MODES',
    'ResNet',
    'ViT',
    'build_backbone',
    'build_model',
    'register_backbone',
    'validate_model_config',
]
