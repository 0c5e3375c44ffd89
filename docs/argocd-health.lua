-- Argo CD health check for the rasterkube custom resources (rasterkube.dev/v1alpha1
-- Mosaic, Prediction, ChangeScore, Vectorization). Install it once per kind as
-- resource.customizations.health.rasterkube.dev_<Kind> in argocd-cm (docs/kubernetes.md).
--
--   Healthy      phase Succeeded and the Ready condition True, both about the current generation
--   Degraded     phase Failed, or the Stalled condition True
--   Progressing  no status yet, status about an older generation, phase Pending/Waiting/Running
--
-- A status about an older generation wins over everything else: after a spec change the old
-- Failed/Succeeded outcome no longer describes the resource, and the operator re-runs it.
-- Only Lua 5.1 base functions are used (Argo CD runs scripts in gopher-lua, sandboxed).

local hs = {}

local function findCondition(conditions, conditionType)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == conditionType then
      return condition
    end
  end
  return nil
end

local function nonEmpty(value)
  if value ~= nil and value ~= "" then
    return value
  end
  return nil
end

-- First non-empty message of the given conditions (in order), or nil.
local function conditionMessage(...)
  for i = 1, select("#", ...) do
    local condition = select(i, ...)
    if condition ~= nil and nonEmpty(condition.message) ~= nil then
      return condition.message
    end
  end
  return nil
end

local status = obj.status
if status == nil or (status.phase == nil and status.conditions == nil and status.observedGeneration == nil) then
  hs.status = "Progressing"
  hs.message = "Waiting for the rasterkube operator to pick up the resource"
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
local observed = status.observedGeneration
if observed == nil or (generation ~= nil and observed ~= generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the rasterkube operator to observe generation " .. tostring(generation or "?")
    .. " (status is about " .. tostring(observed or "none") .. ")"
  return hs
end

local ready = findCondition(status.conditions, "Ready")
local stalled = findCondition(status.conditions, "Stalled")
local reconciling = findCondition(status.conditions, "Reconciling")
local progressMessage = nil
if status.progress ~= nil then
  progressMessage = nonEmpty(status.progress.message)
end

if status.phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  local stalledTrue = nil
  if stalled ~= nil and stalled.status == "True" then
    stalledTrue = stalled
  end
  hs.message = conditionMessage(stalledTrue, ready) or progressMessage or ("phase " .. tostring(status.phase))
  return hs
end

if status.phase == "Succeeded" then
  local readyCurrent = ready ~= nil and ready.status == "True"
    and (generation == nil or ready.observedGeneration == generation)
  if readyCurrent then
    hs.status = "Healthy"
    hs.message = progressMessage or conditionMessage(ready) or "Succeeded"
    return hs
  end
  hs.status = "Progressing"
  hs.message = conditionMessage(ready) or "Waiting for the Ready condition of generation " .. tostring(generation)
  return hs
end

-- Pending, Waiting, Running (or a phase this script does not know yet).
hs.status = "Progressing"
hs.message = progressMessage or conditionMessage(reconciling, ready) or ("phase " .. tostring(status.phase or "unknown"))
return hs
