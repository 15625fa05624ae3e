"""Putting attention processors on a denoiser's sites and the stock ones back, for every family.

A family says only which processor class serves a site (from the site's
:class:`~stableseg_pp.backbones.base.AttentionSite` record, never its name);
what a request asks of each site, which requests make sense for its kind, and
when a repeated install can be skipped are decided here once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch

from stableseg_pp.backbones.base import AttentionSite, AttentionStore, CaptureRequest

PROCESSOR_SUFFIX = ".processor"


@dataclass(frozen=True)
class SiteCapture:
    """What a :class:`CaptureRequest` asks of one site (false when nothing: the stock processor)."""

    class_maps: bool = False
    query_keys: bool = False
    text_logits: bool = False
    head_maps: bool = False

    @classmethod
    def of(cls, request: CaptureRequest, site: str) -> SiteCapture:
        return cls(
            class_maps=site in request.class_maps,
            query_keys=site in request.query_keys,
            text_logits=site in request.text_logits,
            head_maps=site in request.head_maps,
        )

    def __bool__(self) -> bool:  # head maps alone ask for nothing: they refine class maps
        return self.class_maps or self.query_keys or self.text_logits


#: a family's capture processor for a site that asks for something (the installer has checked the site's kind)
CaptureFactory = Callable[[AttentionSite, SiteCapture, AttentionStore], object]


class ProcessorInstaller:
    """Installs processors on one denoiser (anything with diffusers' ``attn_processors`` / ``set_attn_processor``).

    Args:
        stock: makes the family's stock processor (one per layer, as diffusers installs them).
        owner: how errors name the denoiser (e.g. ``this U-Net``).
    """

    def __init__(self, stock: Callable[[], object], owner: str):
        self.stock = stock
        self.owner = owner
        self._installed: tuple[CaptureRequest, AttentionStore, dict[str, object]] | None = None

    def install_capture(
        self,
        denoiser: torch.nn.Module,
        sites: Iterable[AttentionSite],
        request: CaptureRequest,
        store: AttentionStore,
        make: CaptureFactory,
        carry: Collection[str] = (),
    ) -> None:
        """``make``'s processors on the requested sites, the stock one everywhere else; a no-op when exactly these
        are still in place (another user of the backbone may have replaced them). ``carry``: sites that get ``make``'s
        processor even where nothing is asked of them (they carry state to later sites, e.g. a concept stream)."""
        if self._installed and self._installed[0] == request and self._installed[1] is store:
            current = denoiser.attn_processors
            if all(current[n] is p for n, p in self._installed[2].items()):
                return
        asked = (*request.class_maps, *request.query_keys, *request.text_logits)
        records = self._records(sites, (*asked, *carry), "capture request")
        processors = {}
        for name in denoiser.attn_processors:
            site = name.removesuffix(PROCESSOR_SUFFIX)
            wants = SiteCapture.of(request, site)
            if not wants and site not in carry:
                processors[name] = self.stock()
                continue
            record = records[site]
            if (wants.class_maps or wants.text_logits) and not record.attends_to_text:
                raise ValueError(f"site {site} attends to the image only: it has no class maps or text logits")
            processors[name] = make(record, wants, store)
        self._installed = (request, store, processors)
        denoiser.set_attn_processor(dict(processors))

    def install_all(
        self,
        denoiser: torch.nn.Module,
        sites: Iterable[AttentionSite],
        make: Callable[[AttentionSite], object],
        named: str,
        what: str,
    ) -> None:
        """``make``'s processor on every site (the stock one on layers that are no site); ``named``: the site a
        setting (``what``) names, a clear error when there is no such site."""
        records = self._records(sites, (named,), what)
        self._installed = None
        denoiser.set_attn_processor(
            {
                name: make(records[site]) if (site := name.removesuffix(PROCESSOR_SUFFIX)) in records else self.stock()
                for name in denoiser.attn_processors
            }
        )

    def remove(self, denoiser: torch.nn.Module) -> None:
        """The stock processor on every layer."""
        self._installed = None
        denoiser.set_attn_processor({name: self.stock() for name in denoiser.attn_processors})

    def _records(self, sites: Iterable[AttentionSite], requested: Iterable[str], what: str) -> dict[str, AttentionSite]:
        """Site id -> record; a clear error when ``requested`` names a site that is not there."""
        records = {s.id: s for s in sites}
        if unknown := sorted(set(requested) - set(records)):
            raise ValueError(f"{what} names sites {self.owner} does not have: {unknown}")
        return records
