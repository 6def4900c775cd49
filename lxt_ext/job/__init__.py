"""Data-set attribution: ``ExplainJob`` (what ``lxt-ext explain`` runs) streams image files through a
model and a composite into heatmaps, relevance files and a JSONL index; resumable, and sharded over
``torchrun`` processes; ``EvaluationJob`` (``lxt-ext evaluate --generate``) compares attribution methods on
generated held-out images on the same runner (``runner.BatchJob``), and ``ReferenceJob`` (``lxt-ext references``)
each unit's reference samples over a data set. ``settings`` holds ``JobSettings`` (what
a job is told), ``inputs`` collects and decodes the images, ``outputs`` owns the output folder, ``distributed`` the process group."""
from .outputs import SettingsMismatchError
from .evaluation import EvaluationJob
from .references import ReferenceJob, TextReferenceJob
from .runner import BatchJob, ExplainJob, Summary, summary_text
from .settings import JobSettings

__all__ = ['BatchJob', 'EvaluationJob', 'ExplainJob', 'ReferenceJob', 'TextReferenceJob', 'JobSettings', 'Summary', 'summary_text', 'SettingsMismatchError']
