"""Pictures of reference samples: a unit's top images in a strip (each with the unit's most relevant patch boxed,
its conditional heatmap and/or the patch cropped), strips stacked into sheets, and an HTML page per layer.

Used by :class:`lxt_ext.job.references.ReferenceJob`; the functions take plain data (images in 0..1, heatmaps,
boxes, captions) and know nothing of models or jobs.

A strip (:func:`unit_strip`)::

    unit 17, relevance: 0.213 .. 0.091                                   disk 6 of 8
    [image] [image] ...      each image with the patch of the unit's largest value boxed
    #1 0.213 disk  ...
    [heatmap] [heatmap] ...  the unit's conditional heatmap of that image (coldnhot: red positive, blue negative)
    [crop] [crop] ...        the boxed patch with one patch of context, enlarged (``rows`` with 'crop')
"""
import html
from typing import NamedTuple, Optional, Tuple

import numpy as np

from .image import DEFAULT_CMAP, colours

__all__ = ['Reference', 'patch_box', 'unit_strip', 'sheet', 'layer_page', 'index_page', 'text_layer_page', 'ROWS']

ROWS = ('image', 'heatmap', 'crop')
BOX = (0.25, 1.0, 0.25)       # the patch outline: light green, seen on the shapes, the backgrounds and the heatmaps
CELL = 128                    # pixels per picture
CLIP = 0.99                   # heatmaps' colour scale: +-this quantile of |relevance|
GAP = 4                       # pixels between pictures
MARGIN = 6
TITLE, CAPTION = 14, 11       # font sizes


class Reference(NamedTuple):
    """One reference sample of a unit, as a strip shows it.

    Parameters
    ----------
    image : numpy.ndarray or torch.Tensor
        ``(3, H, W)`` in 0..1 (or uint8).
    heatmap : numpy.ndarray or torch.Tensor, optional
        ``(H, W)`` the unit's conditional heatmap of the image.
    box : tuple of int, optional
        ``(top, left, height, width)`` in image pixels: the unit's patch (None: no patch, e.g. the class token).
    caption : str, optional
        Under the image (rank, value, label).
    """
    image: object
    heatmap: object = None
    box: Optional[Tuple[int, int, int, int]] = None
    caption: str = ''


def patch_box(token, tokens, size):
    """The pixels of a token of a square ViT's ``tokens`` (patches in row-major order, after one class token when
    ``tokens`` is a square plus one).

    Parameters
    ----------
    token : int
        The token index.
    tokens : int
        The tokens of the layer.
    size : int
        The image's side in pixels.

    Returns
    -------
    tuple of int or None
        ``(top, left, height, width)``; None for the class token, a negative token (none) or a token count that is
        no square grid.
    """
    token, tokens = int(token), int(tokens)
    if token < 0:
        return None
    grid = int(round(tokens ** 0.5))
    if grid * grid == tokens:
        patch = token
    else:
        grid = int(round((tokens - 1) ** 0.5))
        if grid * grid != tokens - 1 or token == 0:
            return None
        patch = token - 1
    side = size // grid
    return (patch // grid) * side, (patch % grid) * side, side, side


def _font(size):
    from .text import _font as font
    return font(None, size)


def _hwc(image):
    array = np.asarray(image.detach().cpu() if hasattr(image, 'detach') else image)
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255
    array = array.astype(np.float64)
    if array.ndim == 2:
        array = np.repeat(array[None], 3, 0)
    return array.transpose(1, 2, 0)


def clipped(heatmap, quantile=CLIP):
    """``heatmap`` with its values clipped to +-the ``quantile`` of its absolute values (a few extreme pixels
    would otherwise take the whole colour scale); unchanged where that quantile is 0.

    Parameters
    ----------
    heatmap : numpy.ndarray or torch.Tensor
        ``(H, W)``.
    quantile : float, optional
        In 0..1 (1: no clipping).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float64.
    """
    array = np.asarray(heatmap.detach().cpu() if hasattr(heatmap, 'detach') else heatmap, dtype=np.float64)
    bound = np.quantile(np.abs(array), quantile) if quantile < 1 else 0.0
    return np.clip(array, -bound, bound) if bound > 0 else array


def _picture(rgb, cell, box=None, crop=False):
    """A PIL image ``cell`` pixels square of ``(H, W, 3)`` floats: enlarged (nearest) or reduced (area), with the
    box outlined; ``crop``: the box with one box of context around it, enlarged."""
    from PIL import Image, ImageDraw

    height, width = rgb.shape[:2]
    if crop and box is not None:
        top, left, h, w = box
        y0, x0 = max(0, top - h), max(0, left - w)
        y1, x1 = min(height, top + 2 * h), min(width, left + 2 * w)
        rgb = rgb[y0:y1, x0:x1]
        box = (top - y0, left - x0, h, w)
        height, width = rgb.shape[:2]
    picture = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    up = cell >= max(height, width)
    picture = picture.resize((cell, cell), Image.NEAREST if up else Image.BOX)
    if box is not None:
        top, left, h, w = box
        sy, sx = cell / height, cell / width
        line = max(1, cell // 64)
        colour = tuple(int(c * 255) for c in BOX)
        ImageDraw.Draw(picture).rectangle([left * sx, top * sy, (left + w) * sx - 1, (top + h) * sy - 1],
                                          outline=colour, width=line)
    return picture


def unit_strip(references, title, note='', rows=('image', 'heatmap'), cmap=DEFAULT_CMAP, cell=CELL, columns=None,
               clip=CLIP):
    """One unit's reference samples side by side: a title band, then per row kind a row of pictures (module doc).

    Parameters
    ----------
    references : sequence of Reference
        Best first.
    title : str
        The title band's left text (unit, mode, values).
    note : str, optional
        The title band's right text (e.g. the references' majority class).
    rows : sequence of {'image', 'heatmap', 'crop'}, optional
        The rows, in order; captions go under the first.
    cmap : str, optional
        The heatmaps' colour map (zennit's).
    cell : int, optional
        Pixels per picture.
    columns : int, optional
        Columns of the strip (default the references; more leave room, so strips of one sheet align).
    clip : float, optional
        Each heatmap's colour scale ends at this quantile of its absolute values (:func:`clipped`; 1: at the largest).

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw

    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ValueError(f'rows must be some of {ROWS}, got {rows}')
    columns = max(columns or len(references), 1)
    title_font, caption_font = _font(TITLE), _font(CAPTION)
    title_band, caption_band = TITLE + 8, CAPTION + 6
    width = 2 * MARGIN + columns * cell + (columns - 1) * GAP
    height = title_band + len(rows) * (cell + GAP) + caption_band
    strip = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(strip)
    draw.text((MARGIN, 3), title, fill='black', font=title_font)
    if note:
        draw.text((width - MARGIN, 3), note, fill=(60, 60, 60), font=title_font, anchor='ra')
    for j, reference in enumerate(references):
        x, y = MARGIN + j * (cell + GAP), title_band
        rgb = _hwc(reference.image)
        for r, kind in enumerate(rows):
            if kind == 'heatmap':
                picture = (_picture(colours(clipped(reference.heatmap, clip), cmap), cell, reference.box)
                           if reference.heatmap is not None else Image.new('RGB', (cell, cell), (230, 230, 230)))
            else:
                picture = _picture(rgb, cell, reference.box, crop=kind == 'crop')
            strip.paste(picture, (x, y))
            y += cell + GAP
            if r == 0:  # the caption under the first row
                draw.text((x + 1, y - GAP + 3), reference.caption, fill='black', font=caption_font)
                y += caption_band
    return strip


def sheet(strips, title, lines=()):
    """Strips stacked under a header, separated by a rule.

    Parameters
    ----------
    strips : sequence of PIL.Image.Image
        The units' strips (:func:`unit_strip`), of equal width.
    title : str
        The header's first line (larger), wrapped to the width.
    lines : sequence of str, optional
        Further header lines (what the rows show), wrapped to the width.

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw

    width = max([s.width for s in strips] + [400])
    title_font, line_font = _font(TITLE + 2), _font(CAPTION + 1)
    heading = [(part, title_font, TITLE + 8) for part in _wrapped(title, title_font, width - 2 * MARGIN)]
    heading += [(part, line_font, CAPTION + 5) for line in lines
                for part in _wrapped(line, line_font, width - 2 * MARGIN)]
    header = 2 * MARGIN + sum(step for *_, step in heading)
    canvas = Image.new('RGB', (width, header + sum(s.height + 9 for s in strips)), 'white')
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for text, font, step in heading:
        draw.text((MARGIN, y), text, fill='black' if font is title_font else (60, 60, 60), font=font)
        y += step
    y = header
    for strip in strips:
        draw.line([(0, y + 3), (width, y + 3)], fill=(190, 190, 190), width=1)
        canvas.paste(strip, (0, y + 8))
        y += strip.height + 9
    return canvas


def _wrapped(text, font, width):
    """``text`` broken between words into lines at most ``width`` pixels long in ``font``."""
    lines, line = [], ''
    for word in text.split(' '):
        candidate = f'{line} {word}' if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


STYLE = ('body{font-family:"DejaVu Sans",Verdana,sans-serif;margin:1.5em auto;max-width:1200px;color:#111}'
         'h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-top:1px solid #ccc;padding-top:.6em}'
         'h3{font-size:1em;margin:1.2em 0 .3em}table{border-collapse:collapse;margin:.4em 0 1em;font-size:.85em}'
         'td,th{border:1px solid #ccc;padding:2px 7px;text-align:left}td.num{text-align:right;'
         'font-variant-numeric:tabular-nums}img{max-width:100%}.muted{color:#666}')


def _patch(row):
    patch = row.get('patch', row['token'])
    return '-' if patch is None or patch < 0 else str(patch)


def _value_cell(value):
    return f'<td class="num" data-value="{float(value)!r}">{float(value):.4g}</td>'


def layer_page(layer, units, modes, settings_lines, sheets, classes=None):
    """The HTML page of one layer: what was searched, links to the sheets, a summary table of the units, then
    per unit and mode its strip and a table of its references (rank, image, value, token, patch, label).

    Every value is written twice: rounded in the cell's text and exactly (``repr`` of the float) in its
    ``data-value`` attribute.

    Parameters
    ----------
    layer : str
        The layer's name.
    units : sequence of int
        The units, in page order.
    modes : dict
        ``mode -> {unit: {'strip': relative path, 'references': [row, ...]}}``, each row a dict with ``rank``,
        ``image``, ``path``, ``value``, ``token``, optionally ``patch`` (-1: none) and ``label`` (a class index).
    settings_lines : sequence of str
        What was searched (shown as a list).
    sheets : dict
        ``mode -> [relative paths of the sheet PNGs]``.
    classes : sequence of str, optional
        Class names of the labels.

    Returns
    -------
    str
    """
    def name(label):
        if label is None:
            return ''
        return classes[label] if classes is not None and 0 <= label < len(classes) else str(label)

    def majority(rows):
        labels = [r.get('label') for r in rows if r.get('label') is not None]
        if not labels:
            return ''
        best = max(sorted(set(labels)), key=labels.count)
        return f'{name(best)} {labels.count(best)}/{len(rows)}'

    out = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">',
           f'<title>Reference samples: {html.escape(layer)}</title><style>{STYLE}</style></head><body>',
           f'<h1>Reference samples of <code>{html.escape(layer)}</code></h1>',
           '<ul>' + ''.join(f'<li>{html.escape(line)}</li>' for line in settings_lines) + '</ul>',
           '<p><a href="../../index.html">all layers</a> &middot; sheets: ' + ' &middot; '.join(
               f'{html.escape(mode)} ' + ' '.join(f'<a href="{html.escape(p)}">{i + 1}</a>'
                                                  for i, p in enumerate(paths))
               for mode, paths in sheets.items()) + '</p>']
    head = ''.join(f'<th>top {html.escape(m)}</th>' + ('<th>its references\' majority</th>' if classes else '')
                   for m in modes)
    out.append(f'<h2>Units</h2><table><tr><th>unit</th>{head}</tr>')
    for unit in units:
        cells = ''
        for mode, per_unit in modes.items():
            rows = per_unit[unit]['references']
            cells += _value_cell(rows[0]['value']) if rows else '<td></td>'
            if classes:
                cells += f'<td>{html.escape(majority(rows))}</td>'
        out.append(f'<tr><td><a href="#unit-{unit}">{unit}</a></td>{cells}</tr>')
    out.append('</table>')
    for unit in units:
        out.append(f'<h2 id="unit-{unit}">Unit {unit}</h2>')
        for mode, per_unit in modes.items():
            entry = per_unit[unit]
            out.append(f'<div class="mode" id="unit-{unit}-{html.escape(mode)}">'
                       f'<h3>{html.escape(mode)} maximisation</h3>'
                       f'<img src="{html.escape(entry["strip"])}" alt="unit {unit}, {html.escape(mode)}: its reference '
                       f'images and conditional heatmaps" loading="lazy">')
            label_head = '<th>label</th>' if any(r.get('label') is not None for r in entry['references']) else ''
            out.append(f'<table class="refs" data-unit="{unit}" data-mode="{html.escape(mode)}"><tr><th>rank</th>'
                       f'<th>image</th><th>value</th><th>token</th><th>patch</th>{label_head}</tr>')
            for row in entry['references']:
                label = f'<td>{html.escape(name(row.get("label")))}</td>' if label_head else ''
                out.append(f'<tr><td class="num">{row["rank"] + 1}</td><td>{html.escape(str(row["path"]))} '
                           f'<span class="muted">(#{row["image"]})</span></td>{_value_cell(row["value"])}'
                           f'<td class="num">{row["token"]}</td><td class="num">{_patch(row)}</td>{label}</tr>')
            out.append('</table></div>')
    out.append('</body></html>\n')
    return '\n'.join(out)


def index_page(title, settings_lines, layers):
    """The output folder's front page: what was searched and a link per layer.

    Parameters
    ----------
    title : str
        The heading.
    settings_lines : sequence of str
        What was searched.
    layers : sequence of tuple
        ``(layer name, relative link to its page, number of units, {mode: [sheet links]})``.

    Returns
    -------
    str
    """
    out = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">', f'<title>{html.escape(title)}</title>',
           f'<style>{STYLE}</style></head><body>', f'<h1>{html.escape(title)}</h1>',
           '<ul>' + ''.join(f'<li>{html.escape(line)}</li>' for line in settings_lines) + '</ul>',
           '<table><tr><th>layer</th><th>units</th><th>sheets</th></tr>']
    for name, link, count, sheets in layers:
        links = ' &middot; '.join(f'{html.escape(mode)} ' + ' '.join(
            f'<a href="{html.escape(p)}">{i + 1}</a>' for i, p in enumerate(paths)) for mode, paths in sheets.items())
        out.append(f'<tr><td><a href="{html.escape(link)}"><code>{html.escape(name)}</code></a></td>'
                   f'<td class="num">{count}</td><td>{links}</td></tr>')
    out.append('</table></body></html>\n')
    return '\n'.join(out)


def _span_html(span):
    before, top, after = span
    return (html.escape(''.join(before)) + f'<mark><b>{html.escape(top)}</b></mark>' + html.escape(''.join(after)))


def text_layer_page(layer, units, modes, spans, labels, settings_lines):
    """A layer's page of reference text spans (:class:`lxt_ext.job.references.TextReferenceJob`): per unit and mode
    its label and its ranked windows, each the tokens around the unit's top token (highlighted) with the value;
    every text HTML-escaped.

    Parameters
    ----------
    layer : str
        The layer's name.
    units : sequence of int
        Its units, in order.
    modes : dict
        ``mode -> {unit (str): [reference rows]}`` (``rank``, ``image`` (the window), ``path``, ``value``,
        ``token``).
    spans : dict
        ``mode -> {unit (str): [(tokens before, top token, tokens after)]}``, decoded, one per reference row.
    labels : dict
        ``mode -> {unit (str): {'label', 'purity'}}``.
    settings_lines : sequence of str
        What was searched.

    Returns
    -------
    str
    """
    out = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">', f'<title>{html.escape(layer)}</title>',
           f'<style>{STYLE}mark{{background:#ffd27f}}td.text{{white-space:pre-wrap;font-family:monospace}}</style>'
           '</head><body>', f'<h1>Reference text spans of <code>{html.escape(layer)}</code></h1>',
           '<ul>' + ''.join(f'<li>{html.escape(line)}</li>' for line in settings_lines) + '</ul>']
    for unit in units:
        out.append(f'<h2 id="unit-{unit}">unit {unit}</h2>')
        for mode, references in modes.items():
            label = labels[mode][str(unit)]
            shown = ('(none)' if label['label'] is None else
                     f'&ldquo;{html.escape(str(label["label"]))}&rdquo; in {label["purity"]:.0%} of the spans')
            out.append(f'<h3>{html.escape(mode)}: label {shown}</h3>')
            out.append('<table><tr><th>rank</th><th>value</th><th>window</th><th>token</th><th>text</th></tr>')
            for row, span in zip(references[str(unit)], spans[mode][str(unit)]):
                out.append(f'<tr><td class="num">{row["rank"] + 1}</td>{_value_cell(row["value"])}'
                           f'<td>{html.escape(str(row["path"]))}</td><td class="num">{row["token"]}</td>'
                           f'<td class="text">{_span_html(span)}</td></tr>')
            out.append('</table>')
    out.append('</body></html>\n')
    return '\n'.join(out)
