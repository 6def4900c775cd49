"""Evaluation of attributions: perturbation faithfulness (``perturbation``, the papers' ``protocols``),
localisation against masks, method comparisons and their ``statistics`` (bootstrap intervals, paired tests)."""
from .perturbation import (FILLS, MODES, ORDERS, UNITS, Faithfulness, area, blur, faithfulness,
                           perturbation_curve, unit_relevance)
from .localization import pointing_game, relevance_mass_accuracy
from .compare import MethodResult, compare, lrp_method, markdown_table, results_json, save_plot
from .gamma_search import CONV_GAMMAS, LINEAR_GAMMAS, GammaSearch, gamma_search, save_grid
from .protocols import PROTOCOLS, Protocol
from .statistics import (Comparison, Interval, bootstrap_band, bootstrap_interval, holm, paired_comparisons,
                         statistics_markdown)
