"""The shared registry: name -> builder, listing, and the unknown-name error."""

import pytest

from clipline.data.registry import Registry


def test_register_get_list_and_unknown_name():
    reg: Registry = Registry("loss", key="loss.kind")

    @reg.register("infonce")
    def infonce():
        return "i"

    reg.add("siglip", lambda: "s")
    assert reg.get("infonce")() == "i" and reg.names() == ["infonce", "siglip"]
    assert "siglip" in reg and list(reg) == ["infonce", "siglip"]
    with pytest.raises(
        ValueError, match=r"loss.kind='infonse'.*valid: infonce, siglip.*Did you mean 'infonce'"
    ):
        reg.get("infonse")
