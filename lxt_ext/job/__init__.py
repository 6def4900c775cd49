"""Data-set attribution: ``ExplainJob`` (what ``lxt-ext explain`` runs) streams image files through a
model and a composite into heatmaps, relevance files and a JSONL index; resumable, and sharded over
``torchrun`` processes. ``settings`` holds ``JobSettings`` (what a job is told), ``inputs`` collects and
decodes the images, ``outputs`` owns the output folder, ``distributed`` the process group."""
from .outputs import SettingsMismatchError
from .runner import ExplainJob, Summary, summary_text
from .settings import JobSettings

__all__ = ['ExplainJob', 'JobSettings', 'Summary', 'summary_text', 'SettingsMismatchError']
