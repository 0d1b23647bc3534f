/* The ticket status page: the token comes from the link's fragment (#token=), never sent
 * to the server in a URL; the data from GET /v1/tickets/{ticket} with it as a bearer. */
(function () {
  "use strict";

  var zh = (navigator.language || "").toLowerCase().indexOf("zh") === 0;
  var TEXT = zh
    ? {
        title: "工单状态", loading: "加载中…", missing: "链接不完整：缺少工单号或凭证。",
        notFound: "未找到该工单，或凭证不正确。", failed: "暂时无法读取，请稍后重试。",
        ticket: "工单号", state: "状态", opened_at: "提交时间", respond_by: "预计回复",
        resolved_at: "解决时间", messages: "消息数",
        states: { queued: "排队中", assigned: "处理中", resolved: "已解决" },
      }
    : {
        title: "Ticket status", loading: "Loading…", missing: "This link is incomplete: no ticket or token.",
        notFound: "No such ticket, or the link's token is wrong.", failed: "Cannot read the status now; try again later.",
        ticket: "Ticket", state: "State", opened_at: "Opened", respond_by: "Answer expected by",
        resolved_at: "Resolved", messages: "Messages",
        states: { queued: "waiting for an agent", assigned: "with an agent", resolved: "resolved" },
      };

  var status = document.getElementById("status");
  var details = document.getElementById("details");
  document.querySelector("h1").textContent = TEXT.title;

  var query = new URLSearchParams(window.location.search);
  var fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  var ticket = query.get("ticket") || "";
  var token = fragment.get("token") || query.get("token") || "";
  if (!ticket || !token || !/^[A-Za-z0-9_-]{1,64}$/.test(ticket)) {
    status.textContent = TEXT.missing;
    return;
  }
  status.textContent = TEXT.loading;

  function row(label, value) {
    var dt = document.createElement("dt");
    dt.textContent = label;
    var dd = document.createElement("dd");
    dd.textContent = value;
    dd.setAttribute("data-field", label);
    details.appendChild(dt);
    details.appendChild(dd);
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString(zh ? "zh-CN" : undefined) : "";
  }

  fetch("/v1/tickets/" + encodeURIComponent(ticket), {
    headers: { Authorization: "Bearer " + token },
    credentials: "omit",
    cache: "no-store",
  })
    .then(function (response) {
      if (response.status === 404 || response.status === 401) {
        status.textContent = TEXT.notFound;
        return null;
      }
      if (!response.ok) {
        status.textContent = TEXT.failed;
        return null;
      }
      return response.json();
    })
    .then(function (body) {
      if (!body) {
        return;
      }
      status.hidden = true;
      row(TEXT.ticket, body.ticket);
      row(TEXT.state, TEXT.states[body.state] || body.state);
      row(TEXT.opened_at, when(body.opened_at));
      if (body.resolved_at) {
        row(TEXT.resolved_at, when(body.resolved_at));
      } else {
        row(TEXT.respond_by, when(body.respond_by));
      }
      row(TEXT.messages, String(body.messages));
      details.hidden = false;
    })
    .catch(function () {
      status.textContent = TEXT.failed;
    });
})();
