"""Helpers several test modules share: ``Snapshot`` (what a model is before an attribution, compared with what it is
after one), ``no_lxt_ext_left``, and ``ForwardOf``/``freeze_unused`` (a model called as a test case calls it, as a
module of one input, with the parameters its forward does not use frozen)."""
import torch
from torch.nn.modules import module as nn_module


HOOK_DICTS = [name for name in vars(torch.nn.Module()) if name.endswith('_hooks') or 'hooks_' in name]
IMMUTABLE = (bool, int, float, complex, str, bytes, tuple, frozenset, type(None), torch.dtype, torch.device)
GLOBAL_HOOKS = [name for name in vars(nn_module) if name.startswith('_global_') and name.endswith('hooks')]


def seed_for(output, generator):
    return torch.randn(output.shape, generator=generator, dtype=output.dtype)


class Snapshot:
    """What the model is before an attribution, for comparing to what it is after one."""

    def __init__(self, model, x):
        self.parameters = [(name, p, p.requires_grad, p.grad, p.data_ptr()) for name, p in model.named_parameters()]
        self.buffers = [(name, b, b.data_ptr()) for name, b in model.named_buffers()]
        self.state = {name: value.clone() for name, value in model.state_dict(keep_vars=False).items()}
        self.modules = [(name, module, dict(vars(module)), {key: dict(getattr(module, key)) for key in HOOK_DICTS})
                        for name, module in model.named_modules(remove_duplicate=False)]
        self.global_hooks = {name: dict(getattr(nn_module, name)) for name in GLOBAL_HOOKS}
        self.grad_enabled = torch.is_grad_enabled()
        self.output, self.grads = self.plain(model, x)

    @staticmethod
    def plain(model, x):
        input = x.clone().requires_grad_()
        output = model(input)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(output, [input] + trainable, seed_for(output, torch.Generator().manual_seed(3)))
        return output.detach(), grads

    def assert_same(self, model, x):
        assert torch.is_grad_enabled() == self.grad_enabled
        assert {name: dict(getattr(nn_module, name)) for name in GLOBAL_HOOKS} == self.global_hooks

        modules = list(model.named_modules(remove_duplicate=False))
        assert [(name, id(module)) for name, module in modules] == [(name, id(m)) for name, m, _, _ in self.modules]
        for (name, module), (_, _, attributes, hooks) in zip(modules, self.modules):
            now = vars(module)
            added, lost = sorted(set(now) - set(attributes)), sorted(set(attributes) - set(now))
            assert not added and not lost, f'{name!r}: attributes added {added}, lost {lost}'
            for key, value in attributes.items():
                if isinstance(value, dict):
                    assert list(now[key]) == list(value) and all(now[key][k] is v for k, v in value.items()), \
                        f'{name!r}.{key} changed'
                else:
                    # the same object; an equal one only for immutable values (a copied config is a change)
                    assert now[key] is value or (isinstance(value, IMMUTABLE) and type(now[key]) is type(value)
                                                 and now[key] == value), \
                        f'{name!r}.{key} changed: {now[key]!r} (was {value!r})'
            for key, before in hooks.items():
                assert dict(getattr(module, key)) == before, f'{name!r}.{key} changed'

        parameters = list(model.named_parameters())
        assert [(name, id(p)) for name, p in parameters] == [(name, id(p)) for name, p, *_ in self.parameters]
        for (name, p), (_, _, requires_grad, grad, pointer) in zip(parameters, self.parameters):
            assert p.requires_grad == requires_grad, f'{name}.requires_grad changed'
            assert p.grad is grad, f'{name}.grad changed'
            assert p.data_ptr() == pointer, f'{name} is over other storage'
        buffers = list(model.named_buffers())
        assert [(name, id(b), b.data_ptr()) for name, b in buffers] == [(name, id(b), ptr) for name, b, ptr in
                                                                           self.buffers]
        state = model.state_dict()
        assert list(state) == list(self.state)
        for name, value in self.state.items():
            assert state[name].dtype == value.dtype and torch.equal(state[name], value), f'state_dict[{name!r}]'

        output, grads = self.plain(model, x)
        assert torch.equal(output, self.output), 'the plain output changed'
        assert len(grads) == len(self.grads)
        for index, (grad, expected) in enumerate(zip(grads, self.grads)):
            assert torch.equal(grad, expected), 'the plain input gradient changed' if index == 0 else \
                'a plain parameter gradient changed'


def no_lxt_ext_left(model):
    """The direct form of what the snapshot implies, for a readable failure."""
    from lxt_ext.core import ConfigView
    for name, module in model.named_modules():
        assert '_lxt_ext_rule' not in vars(module), name
        assert not isinstance(vars(module).get('config'), ConfigView), f'{name!r} keeps lxt_ext\'s config view'
        assert not any(getattr(module, key) for key in ('_backward_hooks', '_backward_pre_hooks',
                                                        '_forward_pre_hooks')), name
        assert 'canonizer_sum' not in vars(module)['_modules'], name


def freeze_unused(model, x):
    """Parameters the forward does not use (input embeddings, poolers) frozen, as the snapshot takes
    the plain gradient of every trainable one."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).sum(), parameters, allow_unused=True)
    for parameter, grad in zip(parameters, grads):
        parameter.requires_grad_(grad is not None)


class ForwardOf(torch.nn.Module):
    """``model`` called as the case calls it, as a module of one input (for ``Snapshot``)."""

    def __init__(self, model, forward):
        super().__init__()
        self.model = model
        self.call = forward

    def forward(self, x):
        return self.call(self.model, x)
