"""Evaluation of attributions: perturbation faithfulness (``perturbation``) and localisation against masks."""
from .perturbation import (FILLS, MODES, ORDERS, UNITS, Faithfulness, area, blur, faithfulness,
                           perturbation_curve, unit_relevance)
